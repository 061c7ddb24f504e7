"""Several hosts on one machine (network namespaces): see netns.py."""
