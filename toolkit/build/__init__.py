"""toolkit/build"""
