"""Dataset formats, the image decoder, the Ray Data pipelines and the check_dataset mode."""
