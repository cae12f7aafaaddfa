"""tagset"""
