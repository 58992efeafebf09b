"""Published evidence and how the models are held to it: evidence tables, virtual trial arms, the
qualification report, the aggregate-data calibration and its draws."""
