"""SemEval-2025 Task 4 scoring."""
