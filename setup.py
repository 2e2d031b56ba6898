"""Package discovery: setuptools finds every subpackage, including those of `plugins/` and
`backends/`, which are installed as `wwwserve_gateway.plugins` and `wwwserve_gateway.backends`
(the mapping is `package-dir` in pyproject.toml). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup


def mapped(package: str, folder: str) -> list[str]:
    return [package] + [f"{package}.{sub}" for sub in find_packages(folder)]


setup(
    packages=find_packages(include=["wwwserve_gateway", "wwwserve_gateway.*"])
    + mapped("wwwserve_gateway.plugins", "plugins")
    + mapped("wwwserve_gateway.backends", "backends")
)
