"""Evaluation: pass@k on the shipped math benchmarks (AIME24, AIME25, AMC23, MATH500) with math-verify."""
