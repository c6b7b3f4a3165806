import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "criuweb.settings")
application = get_wsgi_application()

# Runs that were in progress when the server last stopped are marked
# interrupted, and their workloads looked up on both hosts.
from migrations_app.worker import recover_on_startup  # noqa: E402

recover_on_startup()
