"""dms_flex: Dynamic Memory Sparsification for PyTorch."""
__version__ = "0.1.0"
