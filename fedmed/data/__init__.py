"""Data sources, preprocessing, site partitions, manifests and datasets."""

from fedmed.data.datamodule import ArrayDataset, Pipeline, SiteData, make_loader
from fedmed.data.file_source import DataError, ImageFolderSource, TableSource
from fedmed.data.manifest import Manifest, read_manifest, write_manifest
from fedmed.data.medmnist_source import MedMNISTSource
from fedmed.data.partition import partition_labels
from fedmed.data.transforms import Preprocessing

__all__ = [
    "ArrayDataset",
    "DataError",
    "ImageFolderSource",
    "Manifest",
    "MedMNISTSource",
    "Pipeline",
    "Preprocessing",
    "SiteData",
    "TableSource",
    "make_loader",
    "partition_labels",
    "read_manifest",
    "write_manifest",
]
