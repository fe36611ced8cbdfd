"""What comes out: tables, figures and the HTML report from stored records.

``report`` (tables and the Markdown report), ``plots`` and ``style`` (the figures, one fixed style
per method), ``html_report`` (one offline, sortable report.html), ``readme_block`` (the generated
results block of the README) and ``protocol_report`` (off the shelf vs fine-tuned).
"""
