"""petct: PET/CT preprocessing — IO, SUV, registration, resampling, normalisation, shards, synthetic cohort, QC."""
