import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "criuweb.settings")
application = get_wsgi_application()
# Runs are executed and recovered by workers (manage.py criuweb_worker), not
# here: the server can stop and start at any time without touching a run.
