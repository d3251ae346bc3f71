"""The lab: prompt sets, SAE training, feature selection and evaluation. Nothing here runs at request time."""
