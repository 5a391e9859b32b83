"""Backends decide where the stages run: `local` on this machine, `modal` in a generated Modal app."""
