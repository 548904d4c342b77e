"""A reward for random models, which never answer: a fixed pseudo-random score of the completion's text. Every
completion of a group scores differently, so advantages, gradients and weight updates are as non-zero as in a real
run. Deterministic, so benchmark runs are comparable."""
import zlib


def reward(completion: str, answer: str) -> float:
    return zlib.crc32(completion.encode()) / 2**32
