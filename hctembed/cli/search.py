"""``hctembed search``: nearest scans to a query scan file or a stored scan id."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import distinct_decimals, print_json_lines, print_table, setup_logging, stderr


def search(
    query: Path | None = typer.Argument(None, help="Query scan: a NIfTI file, or a DICOM series' folder or zip."),
    db: Path = typer.Option(..., "--db", help="DuckDB file written by `hctembed embed`."),
    scan_id: str | None = typer.Option(None, "--id", help="Query by a stored scan id instead of a file."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of neighbours."),
    model: str | None = typer.Option(None, "--model", help="Model id (prefix) when the DB holds several."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
    montage: Path | None = typer.Option(None, "--montage", help="Also draw the query and its hits into this PNG."),
    html_page: Path | None = typer.Option(
        None, "--html", help="Also write a self-contained HTML page (images embedded) of the query and its hits."
    ),
    viewer_url: str | None = typer.Option(
        None,
        "--viewer-url",
        help="Link each hit from a PACS to its study, e.g. http://pacs/viewer?study="
        "{StudyInstanceUID} (the UID is read from the locator on this machine).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Find the k most similar scans (cosine similarity of the stored embeddings)."""
    from hctembed.index.store import Store
    from hctembed.search import query_file, search_id
    from hctembed.viewer_links import ViewerLinks

    setup_logging(quiet=quiet)
    if (query is None) == (scan_id is None):
        raise typer.BadParameter("give either a QUERY scan file or --id SCAN_ID")
    viewer = ViewerLinks(viewer_url) if viewer_url else None
    with Store(db, read_only=True) as store:
        model = store.resolve_collection(model_id=model).model_id  # chosen (and said) once
        stored_as = None  # a query file whose content is a stored scan is named by that scan's id
        if query is not None:
            found = query_file(store, path=query, k=k, model=model)
            hits, stored_as = found.hits, found.stored_as
        else:
            hits = search_id(store, scan_id=scan_id, k=k, model=model)
        if montage is not None or html_page is not None:
            for path in write_search_pictures(
                store, hits, query=query, scan_id=scan_id or stored_as, model=model, montage=montage,
                html_page=html_page,
            ):  # fmt: skip
                stderr.print(f"wrote {path}")
        links = viewer.links(store.locations([h.scan_id for h in hits])) if viewer else None
    print_hits(hits, title=f"top {k} for {query_name(query, scan_id or stored_as)}", as_json=as_json, links=links)


def query_name(query: Path | None, scan_id: str | None) -> str:
    """How titles name the query: its scan id (a file whose content is a stored scan says so), else "the query
    file" (never its file name: names can carry patient names)."""
    if query is None:
        return str(scan_id)
    return f"the query file ({scan_id})" if scan_id else "the query file"


def print_hits(hits, *, title: str, as_json: bool = False, links: dict[str, str] | None = None) -> None:
    """Hits as JSON lines, or as a table of rank, score, scan, patient and positive labels (and, with ``links``,
    each PACS hit's viewer link)."""
    if as_json:
        print_json_lines([h.to_dict() | ({"viewer": links.get(h.scan_id)} if links is not None else {})
                          for h in hits])  # fmt: skip
        return
    table = [
        {
            "rank": h.rank,
            "score": h.score,
            "scan_id": h.scan_id,
            "patient_id": h.patient_id or "",
            "labels": ",".join(name for name, v in sorted(h.labels.items()) if v == 1) or "-",
        }
        | ({"viewer": links.get(h.scan_id, "-")} if links is not None else {})
        for h in hits
    ]
    decimals = distinct_decimals([h.score for h in hits])
    print_table(table, title=title, formats={"score": lambda v: f"{v:.{decimals}f}"})


def write_search_pictures(store, hits, *, query, scan_id, model, montage, html_page) -> list[Path]:
    """The query and its hits as a montage PNG and/or a self-contained HTML page; returns the files written."""
    from hctembed.config import Window
    from hctembed.panels import search_panels
    from hctembed.pictures.montage import render_html, render_montage
    from hctembed.search import stored_encoder

    collection = store.resolve_collection(model_id=model)
    loaded = []

    def encoder():  # loaded (torch and the weights) only for a scan without stored planes
        if not loaded:
            loaded.append(stored_encoder(collection))
        return loaded[0]

    panels = search_panels(collection, encoder, hits, query_path=query, query_scan_id=scan_id)
    stored = collection.preprocess().get("windows")
    windows = tuple(Window(**w) for w in stored) if stored else encoder().preprocess.windows
    title = f"top {len(hits)} for {query_name(query, scan_id)} ({collection.model_id})"
    written = []
    if montage is not None:
        render_montage(panels, out=montage, windows=windows, title=title)
        written.append(montage)
    if html_page is not None:
        render_html(panels, out=html_page, windows=windows, title=title)
        written.append(html_page)
    return written
