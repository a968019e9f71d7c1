"""toolkit/lab"""
