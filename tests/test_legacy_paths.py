"""The flat module paths from before the packages still import, as the very same module objects,
and importing one never rebinds carkin.simulate or carkin.nca (the functions) to a module."""

import importlib

import pytest

import carkin as ck
from carkin._legacy import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_moved_module(old):
    assert importlib.import_module(f"carkin.{old}") is importlib.import_module(f"carkin.{MOVED[old]}")


def test_functions_keep_their_names_after_old_imports():
    import carkin.nca  # noqa: F401
    import carkin.simulate  # noqa: F401

    assert callable(ck.simulate) and ck.simulate.__module__ == "carkin.simulation.simulate"
    assert callable(ck.nca) and ck.nca.__module__ == "carkin.simulation.nca"


def test_trials_and_plots_packages_offer_every_name_of_the_old_modules():
    import carkin.plots
    import carkin.plots.simulation
    import carkin.plots.trials
    import carkin.trials
    import carkin.trials.designs
    import carkin.trials.operating

    pairs = ((carkin.plots, carkin.plots.simulation), (carkin.plots, carkin.plots.trials),
             (carkin.trials, carkin.trials.designs),
             (carkin.trials, carkin.trials.operating))
    for package, module in pairs:
        names = vars(module)
        missing = [k for k in names if not k.startswith("__") and getattr(package, k, None) is not names[k]]
        assert not missing, (package.__name__, missing)
