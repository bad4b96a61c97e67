"""Running a distillation: config, building the pieces, the engine and the run directory."""
