from viscodex_lite import config, demo


def test_demo_writes_a_report(tmp_path):
    report, passed = demo.run(config.current(mode="tiny", env={}), tmp_path)
    assert passed
    text = report.read_text()
    assert "Task arithmetic" in text and "[ok]" in text
    assert report.stat().st_mode & 0o044  # readable by others, not 0600
