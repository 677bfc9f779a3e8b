out = moving_average([3, 5, 4, 8, 6, 9, 7, 11], 3)
assert len(out) == 6
assert [round(v, 2) for v in out] == [4.0, 5.67, 6.0, 7.67, 7.33, 9.0]
assert list(moving_average([1, 2], 2)) == [1.5]
