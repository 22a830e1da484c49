r"""Training scripts for torchhyper's experiments (not part of the installed package).

python -m experiments.train experiments/configs/gmm.json --steps=500
"""
