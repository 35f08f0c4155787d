"""nvmath.linalg: only advanced.Matmul is stood in for."""
