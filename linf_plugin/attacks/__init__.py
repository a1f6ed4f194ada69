"""Empirical robustness: PGD (an upper bound on what any certificate can prove)."""
from .pgd import LOSSES, AttackResult, pgd_attack

__all__ = ["pgd_attack", "AttackResult", "LOSSES"]
