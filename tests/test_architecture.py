"""The package's structure: its layers only point down, with no import cycles, and the public API.

The layering is the import-linter contract in pyproject.toml (``lint-imports`` checks it too):
layers/data/utils -> models/losses/metrics -> engine/train -> sweep/report/demo -> cli. Imports
inside functions count as much as those at the top of a file.
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("dllab")


def test_the_layers_contract_is_kept():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


def test_nothing_in_the_library_imports_the_cli(graph):
    importers = {m for m in graph.modules if m not in ("dllab.cli", "dllab.__main__")
                 and graph.chain_exists(importer=m, imported="dllab.cli")}
    assert not importers


def test_no_import_cycles(graph):
    cycles = {tuple(sorted((a, b))) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
              if graph.chain_exists(importer=b, imported=a)}
    assert not cycles


def test_the_contract_would_see_an_upward_import():
    """The check is not vacuous: an import of the CLI from a trainer is a broken layer."""
    graph = grimp.build_graph("dllab")  # its own copy: the import added below is not real
    graph.add_import(importer="dllab.train.vae", imported="dllab.cli", line_number=1, line_contents="x")
    assert graph.chain_exists(importer="dllab.train", imported="dllab.cli", as_packages=True)
    layers = ["dllab.cli", "dllab.train"]
    assert graph.find_illegal_dependencies_for_layers(layers=layers, containers=set())


def test_public_model_api():
    import torch

    from dllab.models import VAE, DCGANConfig, Discriminator, Generator, VAEConfig, resnet18

    model = resnet18(num_classes=7, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    vae = VAE(VAEConfig(latent_dim=3, in_channels=1, image_size=28))
    assert vae.config.latent_dim == 3
    g, d = Generator(DCGANConfig(nz=8, g_width=8, d_width=8)), Discriminator(DCGANConfig(nz=8, g_width=8, d_width=8))
    assert d(g(torch.randn(2, 8, 1, 1))).shape[0] == 2
