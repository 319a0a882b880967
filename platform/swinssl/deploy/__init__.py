"""Results out: segment new patients (`swinssl predict`), and hand trained models to the tools researchers use
(MONAI bundle, DICOM-SEG, MLflow model, an nnU-Net v2 baseline on our folds)."""
