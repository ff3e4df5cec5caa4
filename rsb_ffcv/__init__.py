"""rsb_ffcv: the RSB ResNet-50 recipes on FFCV. Entry points: python -m rsb_ffcv.<tool> and write_datasets.py."""
from . import startup

startup.cache_ffcv_import_compile()  # before any module imports FFCV
