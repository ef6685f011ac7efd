"""Experiments: presets, the resumable sweep runner, the results database and the reports."""
