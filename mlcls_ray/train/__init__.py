"""Training on Ray Train and the evaluate mode."""
