"""Data sources, preprocessing, site partitions, manifests and datasets."""

from fedmed.data.datamodule import ArrayDataset, Pipeline, SiteData, make_loader
from fedmed.data.file_source import ImageFolderSource
from fedmed.data.files import DataError
from fedmed.data.manifest import Manifest, read_manifest, write_manifest
from fedmed.data.medmnist_source import MedMNISTSource
from fedmed.data.npz_source import NpzSource
from fedmed.data.partition import partition_labels
from fedmed.data.preprocessing import Preprocessing
from fedmed.data.source import SPLITS, DataSource
from fedmed.data.table_source import TableSource

__all__ = [
    "SPLITS",
    "ArrayDataset",
    "DataError",
    "DataSource",
    "ImageFolderSource",
    "Manifest",
    "MedMNISTSource",
    "NpzSource",
    "Pipeline",
    "Preprocessing",
    "SiteData",
    "TableSource",
    "make_loader",
    "partition_labels",
    "read_manifest",
    "write_manifest",
]
