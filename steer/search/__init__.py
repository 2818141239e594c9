"""Steering strategies and the request/result/trace/budget types they share.

Empty until the steering-core issue: only pass-through (`none`) exists, served directly by
`steer.service`. May import `steer.critics` and `steer.engine`, never `steer.service`.
"""
