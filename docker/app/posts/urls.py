"""The study's three routes; AWL_VIEWS picks the sync or the async implementations."""
from django.conf import settings
from django.urls import path

if settings.VIEWS == "async":
    from . import views_async as views
else:
    from . import views_sync as views

urlpatterns = [
    path("cpu/", views.cpu),
    path("io_create/", views.io_create),
    path("io_read/", views.io_read),
]
