"""Data sources, site partitions, manifests and DataModules."""

from fedmed.data.datamodule import ArrayDataset, SiteData, make_loader
from fedmed.data.manifest import Manifest, read_manifest, write_manifest
from fedmed.data.medmnist_source import MedMNISTSource
from fedmed.data.partition import partition_labels

__all__ = [
    "ArrayDataset",
    "Manifest",
    "MedMNISTSource",
    "SiteData",
    "make_loader",
    "partition_labels",
    "read_manifest",
    "write_manifest",
]
