"""imnet-ablate: which parts of ImageNet make it good for transfer learning, measured on your own hardware."""

__version__ = "0.2.0.dev0"
