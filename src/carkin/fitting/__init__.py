"""Population fitting: datasets, the design and population problem, predictions, NUTS and SVI, results
as DataTrees, convergence checks, individual estimates, batches of datasets, diagnostics."""
