def handle(response):
    # Extra point only when the answer says to drop SimpleDateFormat, not to synchronize around it.
    text = response.lower()
    if 'synchronized' in text and 'datetimeformatter' not in text:
        return (0.0, 1.0, 'synchronizing a shared formatter is a bottleneck')
    return (1.0, 1.0, 'ok') if 'datetimeformatter' in text else (0.0, 1.0, 'no java.time formatter')
