"""CT-3DFlow: unsupervised pathology detection in chest CT with a 3D GLOW normalizing flow."""
__version__ = "0.1.0"
