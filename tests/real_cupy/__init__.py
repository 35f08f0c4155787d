"""The real-CuPy tier (scripts/real_cupy_tier.sh) and its walker; see conftest.py."""
