"""Pipeline stages: plain functions over paths; backends decide where they run."""
