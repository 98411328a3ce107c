"""nbdproxy: serve virtual-disk images held by NBD servers over the ovirt-imageio HTTP API."""

from setuptools import find_packages, setup

from nbdproxy import __version__

setup(
    name="nbdproxy",
    version=__version__,
    description=__doc__,
    packages=find_packages(include=["nbdproxy", "nbdproxy.*"]),
    python_requires=">=3.9",
    # libnbd's Python binding ("nbd") is not on PyPI: it comes from Debian's python3-libnbd,
    # seen through a venv made with --system-site-packages.
    install_requires=["webob"],
    entry_points={"console_scripts": ["nbdproxy = nbdproxy.cli:main"]},
)
