from vdgui.gui.app import main

raise SystemExit(main())
