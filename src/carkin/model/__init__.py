"""What a model is: the model interface and its roles, the model library, dose regimens, the population
model (transforms, random and covariate effects, site names), residual error models and physiology."""
