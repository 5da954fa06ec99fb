from certmgr.cli import entry

entry()
