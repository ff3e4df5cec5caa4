"""The one compiled piece: rsb_ffcv/_jpeg.c (region JPEG decoding), linked against the system's libjpeg
(libjpeg-turbo: Debian/Ubuntu package libjpeg-dev). Everything else is in pyproject.toml."""
import shlex
import subprocess

from setuptools import Extension, setup


def pkg_config(flag: str) -> list[str]:
    try:
        return shlex.split(subprocess.run(["pkg-config", flag, "libjpeg"], capture_output=True, text=True,
                                          check=True).stdout)
    except (OSError, subprocess.CalledProcessError):
        return ["-ljpeg"] if flag == "--libs" else []


setup(ext_modules=[Extension("rsb_ffcv._jpeg", ["rsb_ffcv/_jpeg.c"], extra_compile_args=pkg_config("--cflags") + ["-O2"],
                             extra_link_args=pkg_config("--libs"))])
