"""The carkin model library: one file per model, each with a model card as its docstring."""
