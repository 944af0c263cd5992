"""The models, as torchvision exposes its: builders and their config dataclasses.

    from dllab.models import resnet18, VAE, VAEConfig, Generator, Discriminator, DCGANConfig

Each config is a small dataclass handed to the constructor and saved in every checkpoint, so a
run's models can be rebuilt from it.
"""

from dllab.models.dcgan import DCGAN, DCGANConfig, Discriminator, Generator
from dllab.models.resnet import ResNet, ResNetConfig, resnet18
from dllab.models.vae import VAE, VAEConfig

__all__ = ["DCGAN", "DCGANConfig", "Discriminator", "Generator", "ResNet", "ResNetConfig", "VAE",
           "VAEConfig", "resnet18"]
