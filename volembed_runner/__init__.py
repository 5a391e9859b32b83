"""volembed-runner: embed whole datasets from one YAML job spec."""
