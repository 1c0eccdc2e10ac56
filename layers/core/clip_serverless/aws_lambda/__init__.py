"""Lambda plumbing: the function entry, the after-response extension, EMF metrics, secrets at init,
SnapStart hooks, and other functions reached through Invoke. Nothing here is imported by the local server
except the secrets reader (when a key store is configured).
"""
