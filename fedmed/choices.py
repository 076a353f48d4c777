"""The names a config may choose among, kept apart from the code behind them so that a config is
checked (``fedmed.schema``) before torch, Lightning or MONAI are imported."""

PARTITIONS = ("iid", "dirichlet", "quantity", "natural")
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")
ATTRIBUTION_METHODS = ("saliency", "inputxgradient", "integratedgradients", "gradientshap")
EXPLAIN_METHODS = CAM_METHODS + ATTRIBUTION_METHODS
CODECS = ("none", "fp16", "int8", "topk")
SELECTIONS = ("best_val_loss", "best_val_balanced_acc", "best_val_site_balanced_acc", "last")
#: how a site's update weighs in the mean (``federation.weighting``)
WEIGHTINGS = ("examples", "balanced")
#: data sources that read a folder of their own (it must exist; MedMNIST downloads where there is network)
FOLDER_SOURCES = ("ImageFolderSource", "TableSource", "NpzSource")
