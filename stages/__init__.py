"""One module per stage, plus the run configs users start from (clean.yaml is the main job)."""
