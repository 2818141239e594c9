"""Critics: candidate(s) in, scores out. May import `steer.engine` only.

Empty until the steering-core issue.
"""
