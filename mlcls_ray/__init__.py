"""mlcls-ray: multi-label image classification (PaddleX-compatible) as a distributed batch system on Ray."""

__version__ = "0.1.0"
