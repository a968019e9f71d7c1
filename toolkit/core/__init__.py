"""toolkit/core"""
